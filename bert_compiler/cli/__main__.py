"""`python -m bert_compiler.cli`: the `bert-compile` command."""

from bert_compiler.cli.commands import main

if __name__ == "__main__":
    main()
