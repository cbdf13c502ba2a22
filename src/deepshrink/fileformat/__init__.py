"""The .dsz file format."""
