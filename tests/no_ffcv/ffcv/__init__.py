# An import blocker: with this folder first on PYTHONPATH, `import ffcv` fails as on a machine where
# FFCV cannot be built (the lent GPU image). Used by tests/test_no_ffcv.py and the smoke's rehearsal.
raise ImportError("ffcv is blocked here (tests/no_ffcv): the memmap loader must do without it")
