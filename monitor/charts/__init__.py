"""The charts every view of a run shares: the dashboard's pages, the post-mortem report and
the alert emails draw from here, so a chart means the same wherever it is read.

* ``specs``: what each chart shows (``CHARTS``: lines, band, axis titles);
* ``palette``: run colours, line dashes and severity colours;
* ``figures``: pure plotly builders (DataFrame in, ``go.Figure`` out);
* ``markers``: the alert and note markers those figures draw;
* ``png``: the same charts drawn by matplotlib as PNG bytes (reports, emails);
* ``tables``: token cells, sparklines and the run comparison table;
* ``view``: what a panel of charts shows, read from and written to a URL query;
* ``panel``: a panel's figures built from what a ``PanelSource`` reads.

Nothing here knows Dash, and the reads go through a ``PanelSource`` the caller passes (the
dashboard's cached one, the report's straight from the store). Importing this package
imports neither plotly nor matplotlib: each submodule imports what it draws with.
"""
