//! transport (todo)
