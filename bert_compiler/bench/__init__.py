"""`bert-compile bench`: every engine beside its peers, in one run, on real text."""
