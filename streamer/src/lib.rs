//! The volume streamer library (filled by the streamer issue).
