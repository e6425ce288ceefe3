"""Wire models: the JSON shapes of burrow's HTTP APIs (the contract the console imports)."""
