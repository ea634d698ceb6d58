//! flockerctl library: configuration, planner, CLI (filled by the workspace issue).
