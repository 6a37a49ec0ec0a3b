"""An app with its own ``accounts`` table, a welcome-mail hook and a forwarding sink (see README.md)."""
