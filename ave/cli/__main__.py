"""``python -m ave.cli``: the ``ave`` command."""
import sys

from ave.cli.main import main

sys.exit(main())
