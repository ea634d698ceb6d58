//! The cluster certificate authority: `flockerctl ca init|node|user` (filled by the agent issue).
