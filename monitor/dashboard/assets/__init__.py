"""The dashboard's static files (served by Dash from this folder); a package so the
wheel ships them (package-data patterns apply per package)."""
