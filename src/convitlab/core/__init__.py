"""What every layer shares and nothing else: one-line errors, atomic files and the one file hasher,
the run directory's layout, the table format and its columns, stop signals, process start times,
ranks, safe unpickling. Nothing here imports another part of convitlab, and nothing here loads
Paddle at import."""
