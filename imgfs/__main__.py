from imgfs.cli import main

raise SystemExit(main())
