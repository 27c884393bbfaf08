//! SeaTable REST client (being written).
