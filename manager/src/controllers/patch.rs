//! Read-modify-write helpers over [`Store::modify`] and [`Store::modify_status`] (which
//! retry when someone else wrote in between): controllers and the agent service write
//! different fields of the same resources. A resource that is gone is not an error here.

use crate::resources::Object;
use crate::store::{Store, StoreError};

/// Applies `f` to the newest spec/metadata of `name`; `None` when it does not exist.
pub async fn patch_spec<K, F>(store: &Store, name: &str, mut f: F) -> Result<Option<K>, StoreError>
where
    K: Object,
    F: FnMut(&mut K) + Send,
{
    match store
        .modify::<K, _>(name, |o| {
            f(o);
            Ok(())
        })
        .await
    {
        Err(e) if e.is_not_found() => Ok(None),
        r => r,
    }
}

/// Applies `f` to the newest status of `name`; `None` when it does not exist.
pub async fn patch_status<K, F>(
    store: &Store,
    name: &str,
    mut f: F,
) -> Result<Option<K>, StoreError>
where
    K: Object,
    F: FnMut(&mut K) + Send,
{
    match store
        .modify_status::<K, _>(name, |o| {
            f(o);
            Ok(())
        })
        .await
    {
        Ok(k) => Ok(Some(k)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Deletes `name`; one that is gone already is fine.
pub async fn delete<K: Object>(store: &Store, name: &str) -> Result<(), StoreError> {
    match store.delete::<K>(name).await {
        Ok(_) => Ok(()),
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(e),
    }
}
