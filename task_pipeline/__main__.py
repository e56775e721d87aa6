from task_pipeline.cli import main

raise SystemExit(main())
