"""Exceptions that name what is wrong with an input. All derive from ``ValueError`` so callers
(CLI, MONAI Label app) can turn them into a clear message / HTTP 4xx without catching programming errors."""


class InputError(ValueError):
    """Bad user input: a message meant to be shown as it is."""


class GeometryError(InputError):
    """FLAIR/T1 (or image/mask) grids do not match: shape, voxel size, orientation or origin."""


class EmptyDomainError(InputError):
    """A lesion domain, mask or volume holds no voxel."""


class UnknownLesionError(InputError):
    """A lesion id that is not in the instance label map."""
