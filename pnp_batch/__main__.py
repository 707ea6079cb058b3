from pnp_batch.cli import main

raise SystemExit(main())
