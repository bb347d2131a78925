import sys

from skipnets.cli import main

sys.exit(main())
