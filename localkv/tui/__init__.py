"""Terminal front ends: the Textual chat app (``app.py``) and the plain line-by-line chat (``repl.py``)."""
