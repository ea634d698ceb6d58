//! Network namespaces on a bridge with addresses from 198.18.0.0/15 (filled by the routing issue).
