"""bert-compiler's stages, runner and CLI: Hugging Face BERT-family encoders -> verified engines.

Stages are plain functions from artifacts to artifacts (export, simplify, fuse, calibrate, build,
verify); ``triton/`` packages verified engines and gates the repository; the runner chains them and
skips what is up to date; the CLI (``bert-compile``) parses option groups into specs and calls them.
"""
