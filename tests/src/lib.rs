//! End-to-end tests of the `tandem` binary and its nodes; the tests live in `tests/tests/`.
