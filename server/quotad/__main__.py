import sys

from quotad.cli import main

sys.exit(main())
