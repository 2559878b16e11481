//! Errors as `Status` objects, routing, and the request handler.

use super::*;

// ---------------------------------------------------------------------------
// Errors and responses

/// A failure answered with a `Status` object.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) code: u16,
    pub(crate) reason: &'static str,
    pub(crate) message: String,
}

impl ApiError {
    pub(crate) fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub(crate) fn not_found(ty: &ResourceType, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", ty.qualified()),
        )
    }

    pub(crate) fn conflict(ty: &ResourceType, name: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                ty.qualified()
            ),
        )
    }

    pub(crate) fn status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }

    pub(crate) fn response(&self) -> Response<Body> {
        json_response(
            StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            &self.status(),
        )
    }
}

pub(crate) fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

pub(crate) type ApiResult = Result<Response<Body>, ApiError>;

// ---------------------------------------------------------------------------
// Routing

#[derive(Debug)]
pub(crate) enum Target {
    Version,
    Collection {
        ty: &'static ResourceType,
        ns: Option<String>,
    },
    Object {
        ty: &'static ResourceType,
        ns: Option<String>,
        name: String,
        status: bool,
    },
}

pub(crate) fn route(path: &str) -> Result<Target, ApiError> {
    let not_found = || {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    };
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, version, rest) = match segments.as_slice() {
        ["version"] => return Ok(Target::Version),
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(not_found()),
    };
    let (ns, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
        _ => (None, rest),
    };
    let (plural, name, sub) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(*name), None),
        [plural, name, sub] => (*plural, Some(*name), Some(*sub)),
        _ => return Err(not_found()),
    };
    let ty = TYPES
        .iter()
        .find(|t| t.group == group && t.version == version && t.plural == plural)
        .ok_or_else(not_found)?;
    if ns.is_some() && !ty.namespaced {
        return Err(not_found());
    }
    match (name, sub) {
        (None, _) => Ok(Target::Collection { ty, ns }),
        (Some(name), sub) => {
            if ty.namespaced && ns.is_none() {
                return Err(not_found());
            }
            let status = match sub {
                None => false,
                Some("status") if ty.status_subresource => true,
                Some(_) => return Err(not_found()),
            };
            Ok(Target::Object {
                ty,
                ns,
                name: name.to_owned(),
                status,
            })
        }
    }
}

pub(crate) async fn handle(
    shared: Shared,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    shared.db().requests.push(RecordedRequest {
        method: method.to_string(),
        path: path.clone(),
        query: query.clone(),
    });
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Ok(ApiError::bad_request(format!("reading the body: {e}")).response()),
    };
    let result = match route(&path) {
        Err(e) => Err(e),
        Ok(Target::Version) => Ok(json_response(
            StatusCode::OK,
            &json!({"major": "1", "minor": "34", "gitVersion": "v1.34.0-raven-fake", "platform": "linux/amd64"}),
        )),
        Ok(Target::Collection { ty, ns }) => match method {
            Method::GET if query.get("watch").is_some_and(|w| w == "true" || w == "1") => {
                watch(&shared, ty, ns, &query)
            }
            Method::GET => list(&shared, ty, ns.as_deref(), &query),
            Method::POST => create(&shared, ty, ns.as_deref(), &body),
            _ => Err(method_not_allowed(&method)),
        },
        Ok(Target::Object {
            ty,
            ns,
            name,
            status,
        }) => {
            let ns = ns.as_deref();
            match method {
                Method::GET => get(&shared, ty, ns, &name),
                Method::PUT => replace(&shared, ty, ns, &name, status, &body),
                Method::PATCH => {
                    patch(&shared, ty, ns, &name, status, &content_type, &query, &body)
                }
                Method::DELETE if !status => delete(&shared, ty, ns, &name, &body),
                _ => Err(method_not_allowed(&method)),
            }
        }
    };
    Ok(result.unwrap_or_else(|e| e.response()))
}

pub(crate) fn method_not_allowed(method: &Method) -> ApiError {
    ApiError::new(
        405,
        "MethodNotAllowed",
        format!("the server does not allow this method on the requested resource: {method}"),
    )
}

pub(crate) fn parse_object(body: &[u8]) -> Result<Value, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not a JSON object: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad_request("the body is not a JSON object"));
    }
    Ok(v)
}

/// The request body must describe the type, name and namespace of the URL.
pub(crate) fn check_identity(
    ty: &ResourceType,
    ns: Option<&str>,
    name: Option<&str>,
    object: &Value,
) -> Result<(), ApiError> {
    if let Some(kind) = object["kind"].as_str()
        && kind != ty.kind
    {
        return Err(ApiError::bad_request(format!(
            "the kind of the provided object ({kind}) does not match the resource ({})",
            ty.kind
        )));
    }
    if let Some(body_ns) = object["metadata"]["namespace"].as_str()
        && !body_ns.is_empty()
        && Some(body_ns) != ns
    {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    if let Some(name) = name
        && object["metadata"]["name"].as_str() != Some(name)
    {
        return Err(ApiError::bad_request(
            "the name of the object does not match the name on the URL",
        ));
    }
    Ok(())
}
