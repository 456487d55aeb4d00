"""What compare.py's tables and plots.py's figures share: where a run falls in a comparison table
(its ROW and COLUMN positions, working columns of Comparison.runs), how a table value is shown,
and columns as floats."""
import math

import numpy as np
import pandas as pd

# Working columns of Comparison.runs: the table row and column (positions) each run falls in.
ROW, COLUMN = "_row", "_column"


def show(value) -> str:
    """A key or column value as the tables and plots show it: "–" when missing, floats by %g."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:g}" if isinstance(value, float) else str(value)


def floats(series) -> np.ndarray:
    """A column as float64 values (NA as NaN), as the plots and curves compute with them."""
    return series.astype("float64").to_numpy()
