"""The three stack roles, each written as the ordered steps of its stack."""
