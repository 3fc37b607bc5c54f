//! The generation comparison rule of `shared/conformance/README.md`, shared by the engine-level
//! conformance test and the OpenAI-API one: greedy ids equal llama.cpp's step by step until the
//! end, or until a divergence at a near-tie (reference top-2 margin < 0.5); each matched
//! token's log-probability within 0.25 of llama.cpp's; the same stop at the end.

#![allow(dead_code)]

use llm_worker_rbee::generation::FinishReason;

/// A divergence is accepted only where llama.cpp's top two were this close (README rule).
pub const NEAR_TIE_MARGIN: f64 = 0.5;
/// Matched tokens' log-probabilities must be this close to llama.cpp's (README rule).
pub const LOGPROB_TOLERANCE: f64 = 0.25;

/// What the worker generated for one case.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub finish: FinishReason,
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// The README's comparison rule; returns a one-line summary on success.
pub fn compare(case: &serde_json::Value, ours: &Outcome) -> Result<String, String> {
    let want = ids(&case["generated_ids"]);
    let steps = case["steps"].as_array().ok_or("no steps")?;
    let mut max_delta = 0f64;
    for (i, (&got, &expected)) in ours.tokens.iter().zip(&want).enumerate() {
        let step = &steps[i];
        if got != expected {
            let margin = step["margin"].as_f64().ok_or("no margin")?;
            if margin < NEAR_TIE_MARGIN {
                return Ok(format!(
                    "diverged at near-tie step {i} (margin {margin:.3}), max |dlogprob| before \
                     it {max_delta:.3}"
                ));
            }
            return Err(format!(
                "step {i}: token {got}, llama.cpp {expected} with a clear margin {margin:.3}"
            ));
        }
        let reference = step["logprob"].as_f64().ok_or("no logprob")?;
        let delta = (f64::from(ours.logprobs[i]) - reference).abs();
        if std::env::var_os("CONFORMANCE_VERBOSE").is_some() {
            eprintln!(
                "  step {i:2} token {got:6} ours {:8.4} llama.cpp {reference:8.4} delta {delta:.4}",
                ours.logprobs[i]
            );
        }
        if delta > LOGPROB_TOLERANCE {
            return Err(format!(
                "step {i}: token {got} logprob differs by {delta:.3}"
            ));
        }
        max_delta = max_delta.max(delta);
    }
    if ours.tokens.len() != want.len() {
        return Err(format!(
            "agreed on all {} common steps but generated {} tokens, llama.cpp {}",
            ours.tokens.len().min(want.len()),
            ours.tokens.len(),
            want.len()
        ));
    }
    let expected_finish = match case["stop_reason"].as_str() {
        Some("eos") => FinishReason::Eos,
        Some("limit") => FinishReason::MaxTokens,
        other => return Err(format!("unknown reference stop reason {other:?}")),
    };
    if ours.finish != expected_finish {
        return Err(format!(
            "finish {:?}, llama.cpp {expected_finish:?}",
            ours.finish
        ));
    }
    Ok(format!(
        "all {} steps equal, max |dlogprob| {max_delta:.3}",
        want.len()
    ))
}
