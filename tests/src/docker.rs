//! `dockerd` inside a network namespace and locally built images (filled by the agent issue).
