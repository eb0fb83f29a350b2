"""``python -m defectscope.cli``."""

from defectscope.cli.app import main

raise SystemExit(main())
