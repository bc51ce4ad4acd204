"""One module per document format; each turns bytes into an `Extracted` or raises a domain error."""
