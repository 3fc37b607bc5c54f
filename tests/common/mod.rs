pub mod conformance_rule;
pub mod default_model;
pub mod scripted;
pub mod tiny_models;
