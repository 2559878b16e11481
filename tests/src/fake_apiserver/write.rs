//! GET, POST, PUT, PATCH, DELETE.

use super::*;

// ---------------------------------------------------------------------------
// GET, POST, PUT, PATCH, DELETE

pub(crate) fn get(
    shared: &Shared,
    ty: &'static ResourceType,
    ns: Option<&str>,
    name: &str,
) -> ApiResult {
    let db = shared.db();
    let object = existing(&db, ty, &key(ns, name), name)?;
    Ok(json_response(StatusCode::OK, object))
}

/// The stored object `name` (at `key`), or the API's 404 for it.
fn existing<'a>(
    db: &'a Db,
    ty: &ResourceType,
    key: &str,
    name: &str,
) -> Result<&'a Value, ApiError> {
    db.current(ty, key)
        .ok_or_else(|| ApiError::not_found(ty, name))
}

/// A new object as it is stored: without a status where status is written
/// through `/status` only, and without the client's resourceVersion.
fn as_new(ty: &ResourceType, object: Value) -> Value {
    let mut object = if ty.status_subresource {
        with_status(object, None)
    } else {
        object
    };
    object["metadata"]["resourceVersion"] = Value::Null;
    object
}

/// `object` with `status` as its status, or none.
fn with_status(mut object: Value, status: Option<&Value>) -> Value {
    match status {
        Some(s) => object["status"] = s.clone(),
        None => {
            if let Some(o) = object.as_object_mut() {
                o.remove("status");
            }
        }
    }
    object
}

pub(crate) fn create(
    shared: &Shared,
    ty: &'static ResourceType,
    ns: Option<&str>,
    body: &[u8],
) -> ApiResult {
    if ty.namespaced && ns.is_none() {
        return Err(ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ));
    }
    let object = parse_object(body)?;
    check_identity(ty, ns, None, &object)?;
    let name = object["metadata"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            ApiError::new(
                422,
                "Invalid",
                format!(
                    "{} is invalid: metadata.name: Required value: name is required",
                    ty.kind
                ),
            )
        })?
        .to_owned();
    let mut db = shared.db();
    let key = key(ns, &name);
    if db.current(ty, &key).is_some() {
        return Err(ApiError::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", ty.qualified()),
        ));
    }
    let object = Shared::normalize(&mut db, ty, ns, as_new(ty, object), None);
    let stored = shared.commit(&mut db, ty, &key, Some(object));
    Ok(json_response(
        StatusCode::CREATED,
        &stored.unwrap_or_default(),
    ))
}

/// Rejects a write whose `metadata.resourceVersion` is not the stored one.
pub(crate) fn precondition(
    ty: &ResourceType,
    name: &str,
    current: &Value,
    given: &Value,
) -> Result<(), ApiError> {
    match given.as_str().filter(|v| !v.is_empty()) {
        Some(rv) if Some(rv) != current["metadata"]["resourceVersion"].as_str() => {
            Err(ApiError::conflict(ty, name))
        }
        _ => Ok(()),
    }
}

/// Merges a write into the stored object according to the endpoint:
/// `/status` takes only the status, the main resource keeps the status.
pub(crate) fn merge_for_endpoint(
    ty: &ResourceType,
    status: bool,
    current: &Value,
    written: Value,
) -> Value {
    if status {
        let status = written.get("status").filter(|s| !s.is_null());
        with_status(current.clone(), status)
    } else if ty.status_subresource {
        with_status(written, current.get("status"))
    } else {
        written
    }
}

pub(crate) fn replace(
    shared: &Shared,
    ty: &'static ResourceType,
    ns: Option<&str>,
    name: &str,
    status: bool,
    body: &[u8],
) -> ApiResult {
    let object = parse_object(body)?;
    check_identity(ty, ns, Some(name), &object)?;
    let mut db = shared.db();
    let key = key(ns, name);
    let current = existing(&db, ty, &key, name)?.clone();
    let given = &object["metadata"]["resourceVersion"];
    if ty.requires_resource_version && given.as_str().is_none_or(str::is_empty) {
        return Err(ApiError::new(
            422,
            "Invalid",
            format!(
                "{} \"{name}\" is invalid: metadata.resourceVersion: Invalid value: 0x0: must be specified for an update",
                ty.kind
            ),
        ));
    }
    precondition(ty, name, &current, given)?;
    let next = merge_for_endpoint(ty, status, &current, object);
    let next = Shared::normalize(&mut db, ty, ns, next, Some(&current));
    let stored = shared.commit(&mut db, ty, &key, Some(next));
    Ok(json_response(StatusCode::OK, &stored.unwrap_or_default()))
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn patch(
    shared: &Shared,
    ty: &'static ResourceType,
    ns: Option<&str>,
    name: &str,
    status: bool,
    content_type: &str,
    query: &BTreeMap<String, String>,
    body: &[u8],
) -> ApiResult {
    let media = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let apply = media == "application/apply-patch+yaml";
    if apply && query.get("fieldManager").is_none_or(String::is_empty) {
        return Err(ApiError::bad_request(
            "PATCH requests with apply content type need a fieldManager",
        ));
    }
    let patch: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the patch is not JSON (the fake API server reads apply bodies as JSON only): {e}"
        ))
    })?;
    let mut db = shared.db();
    let key = key(ns, name);
    let current = db.current(ty, &key).cloned();
    let merged = match (media.as_str(), current.as_ref()) {
        // Server-side apply of a missing object creates it.
        ("application/apply-patch+yaml", None) if !status => {
            check_identity(ty, ns, Some(name), &patch)?;
            let object = Shared::normalize(&mut db, ty, ns, as_new(ty, patch.clone()), None);
            record_patch(&mut db, ty, &key, status, &media, &patch);
            let stored = shared.commit(&mut db, ty, &key, Some(object));
            return Ok(json_response(
                StatusCode::CREATED,
                &stored.unwrap_or_default(),
            ));
        }
        (_, None) => return Err(ApiError::not_found(ty, name)),
        (
            "application/merge-patch+json"
            | "application/strategic-merge-patch+json"
            | "application/apply-patch+yaml",
            Some(current),
        ) => {
            if !patch.is_object() {
                return Err(ApiError::bad_request("the patch is not a JSON object"));
            }
            precondition(ty, name, current, &patch["metadata"]["resourceVersion"])?;
            let mut doc = current.clone();
            json_patch::merge(&mut doc, &patch);
            doc
        }
        ("application/json-patch+json", Some(current)) => {
            let ops: json_patch::Patch = serde_json::from_value(patch.clone())
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            let mut doc = current.clone();
            json_patch::patch(&mut doc, &ops).map_err(|e| {
                ApiError::new(422, "Invalid", format!("the JSON patch failed: {e}"))
            })?;
            precondition(ty, name, current, &doc["metadata"]["resourceVersion"])?;
            doc
        }
        _ => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!("the body of the request was in an unknown format: {content_type}"),
            ));
        }
    };
    let current = current.unwrap_or_default();
    let mut merged = merged;
    // Name and namespace are immutable.
    merged["metadata"]["name"] = current["metadata"]["name"].clone();
    let next = merge_for_endpoint(ty, status, &current, merged);
    let next = Shared::normalize(&mut db, ty, ns, next, Some(&current));
    record_patch(&mut db, ty, &key, status, &media, &patch);
    let stored = shared.commit(&mut db, ty, &key, Some(next));
    Ok(json_response(StatusCode::OK, &stored.unwrap_or_default()))
}

pub(crate) fn record_patch(
    db: &mut Db,
    ty: &ResourceType,
    key: &str,
    status: bool,
    media: &str,
    body: &Value,
) {
    db.patches.push(RecordedPatch {
        resource: ty.plural.to_owned(),
        key: key.to_owned(),
        subresource: status.then(|| "status".to_owned()),
        content_type: media.to_owned(),
        body: body.clone(),
    });
}

pub(crate) fn delete(
    shared: &Shared,
    ty: &'static ResourceType,
    ns: Option<&str>,
    name: &str,
    body: &[u8],
) -> ApiResult {
    let mut db = shared.db();
    let key = key(ns, name);
    let current = existing(&db, ty, &key, name)?.clone();
    if !body.is_empty() {
        let options = parse_object(body)?;
        precondition(
            ty,
            name,
            &current,
            &options["preconditions"]["resourceVersion"],
        )?;
    }
    let deleted = shared.commit(&mut db, ty, &key, None);
    Ok(json_response(StatusCode::OK, &deleted.unwrap_or_default()))
}
