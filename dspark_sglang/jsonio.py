"""What `json.loads` raises on text a user handed us, for every reader that turns it into its own error.

- ValueError: bad syntax (`JSONDecodeError`), bytes that are not UTF-8 (`UnicodeDecodeError`, when
  read with `read_text`), and an integer literal past Python's 4300-digit str limit (a plain
  ValueError, not a JSONDecodeError);
- RecursionError: absurdly deep nesting (`[[[[...`).
"""

JSON_PARSE_ERRORS = (ValueError, RecursionError)
