//! IMAP side of the relay (being written).
