//! The SeaTable schema the relay needs (being written).
