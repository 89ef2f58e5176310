"""Applications: the tools that use the services: the `cbir` CLI, the demo runner, the index build
(`apps.ingest`) and the evaluation (`apps.eval`). They may import the core (`cbir`), the services
and the UI; nothing imports them back."""
