import sys

from nfgen.cli import main

sys.exit(main())
