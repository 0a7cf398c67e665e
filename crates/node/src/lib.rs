//! tunenet-node
