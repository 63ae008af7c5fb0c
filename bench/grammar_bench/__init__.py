"""The pieces of bench/grammar_compare.py (run that)."""
