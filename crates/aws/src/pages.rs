//! Pagination shared by the EC2 and Auto Scaling listings.

use cps_provider::{CallLog, Error};

/// Follows `NextToken` until the last page (bounded by `max_pages`), counting every request.
pub(crate) async fn paginate<T, F, Fut>(
    calls: &CallLog,
    operation: &'static str,
    max_pages: usize,
    mut page: F,
) -> Result<Vec<T>, Error>
where
    F: FnMut(Option<String>) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, Option<String>), Error>>,
{
    let mut found = Vec::new();
    let mut token: Option<String> = None;
    for _ in 0..max_pages {
        calls.record(operation);
        let (items, next) = page(token.take()).await?;
        found.extend(items);
        match next {
            Some(t) if !t.is_empty() => token = Some(t),
            _ => return Ok(found),
        }
    }
    Err(Error::Api {
        operation,
        code: None,
        message: format!("pagination did not end after {max_pages} pages"),
    })
}
