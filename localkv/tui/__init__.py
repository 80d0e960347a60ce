"""Terminal front ends: the plain REPL now, the Textual chat app with the TUI issue."""
