"""bert-compiler: stages that turn Hugging Face BERT-family encoders into verified engines.

Stages are plain functions from artifacts to artifacts (export, simplify, fuse, build, verify); the
runner chains them and skips what is up to date; the CLI (``bert-compile``) is thin over them.
"""

__version__ = "0.1.0"
