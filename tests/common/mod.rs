pub mod default_model;
pub mod tiny_models;
