"""The stages: plain functions from artifacts to artifacts (export, simplify, fuse, calibrate
and its sweep, build, verify and its INT8 fallback), and the OUT tree they write (layout)."""
