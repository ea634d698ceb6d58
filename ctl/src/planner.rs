//! The cluster planner (being written).
