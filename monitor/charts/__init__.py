"""The charts every view of a run shares: the dashboard's pages, the post-mortem report and
the alert emails draw from here, so a chart means the same wherever it is read.

* ``specs``: what each chart shows (``CHARTS``: lines, band, axis titles);
* ``palette``: run colours, line dashes and severity colours;
* ``figures``: pure plotly builders (DataFrame in, ``go.Figure`` out);
* ``png``: the same charts drawn by matplotlib as PNG bytes (reports, emails);
* ``tables``: token cells, sparklines and the run comparison table.

Nothing here reads the database or knows Dash; importing this package imports neither
plotly nor matplotlib (each submodule imports what it draws with).
"""
