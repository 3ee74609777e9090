import sys

from msxai.cli import main

sys.exit(main())
