//! Conversions between engine values and Python objects.

use std::time::Duration;

use blockferry::S3Options;
use pyo3::IntoPyObjectExt;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::errors::config_error;

/// A JSON value (an engine report serialised with serde) as plain Python objects.
pub(crate) fn json_to_py(py: Python<'_>, v: &serde_json::Value) -> PyResult<Py<PyAny>> {
    Ok(bound(py, v)?.unbind())
}

fn bound<'py>(py: Python<'py>, v: &serde_json::Value) -> PyResult<Bound<'py, PyAny>> {
    use serde_json::Value;
    match v {
        Value::Null => Ok(py.None().into_bound(py)),
        Value::Bool(b) => b.into_bound_py_any(py),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                u.into_bound_py_any(py)
            } else if let Some(i) = n.as_i64() {
                i.into_bound_py_any(py)
            } else {
                n.as_f64().unwrap_or(f64::NAN).into_bound_py_any(py)
            }
        }
        Value::String(s) => s.into_bound_py_any(py),
        Value::Array(a) => {
            let items = a
                .iter()
                .map(|x| bound(py, x))
                .collect::<PyResult<Vec<_>>>()?;
            Ok(PyList::new(py, items)?.into_any())
        }
        Value::Object(o) => {
            let d = PyDict::new(py);
            for (k, x) in o {
                d.set_item(k, bound(py, x)?)?;
            }
            Ok(d.into_any())
        }
    }
}

/// A serialisable engine value as Python objects.
pub(crate) fn to_py<T: serde::Serialize>(py: Python<'_>, v: &T) -> PyResult<Py<PyAny>> {
    let json = serde_json::to_value(v)
        .map_err(|e| config_error(format!("cannot convert a result: {e}")))?;
    json_to_py(py, &json)
}

/// Seconds from Python as a duration (refusing negative, NaN and infinite values).
pub(crate) fn seconds(what: &str, s: f64) -> PyResult<Duration> {
    if s.is_finite() && s >= 0.0 {
        Duration::try_from_secs_f64(s).map_err(|e| config_error(format!("{what}: {e}")))
    } else {
        Err(config_error(format!(
            "{what} must be a number of seconds, not {s}"
        )))
    }
}

/// S3 settings from the dict the Python layer builds of its keyword arguments.
pub(crate) fn s3_options(d: Option<&Bound<'_, PyDict>>) -> PyResult<S3Options> {
    let mut o = S3Options::default();
    let Some(d) = d else {
        return Ok(o);
    };
    let mut key = None;
    let mut secret = None;
    for (k, v) in d.iter() {
        let k: String = k.extract()?;
        if v.is_none() {
            continue;
        }
        match k.as_str() {
            "endpoint" => o.endpoint = Some(v.extract()?),
            "region" => o.region = Some(v.extract()?),
            "path_style" => o.path_style = Some(v.extract()?),
            "access_key" => key = Some(v.extract::<String>()?),
            "secret_key" => secret = Some(v.extract::<String>()?),
            "attempt_timeout" => o.attempt_timeout = seconds("attempt_timeout", v.extract()?)?,
            "min_part_size" => o.min_part_size = Some(v.extract()?),
            "max_attempts" => o.max_attempts = v.extract()?,
            "ca_bundle" => o.ca_bundle = Some(v.extract::<std::path::PathBuf>()?),
            _ => return Err(config_error(format!("unknown S3 option {k:?}"))),
        }
    }
    match (key, secret) {
        (Some(k), Some(s)) => o.static_credentials = Some((k, s)),
        (None, None) => {}
        _ => {
            return Err(config_error(
                "give both access_key and secret_key, or neither (then the AWS chain is used)",
            ));
        }
    }
    Ok(o)
}
