"""The commands beside `compress run` (bench, analyze): orchestration on top of the libraries."""
