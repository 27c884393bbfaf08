//! The recipient-facing commands of the bot: `/reports` lists what a person or group receives
//! (and its title filters),
//! `/mute <mailbox>` pauses a mailbox for the person who sends it and `/unmute [mailbox]`
//! resumes it. Mutes live in the state (`State::mute`), never in the sysadmins' SeaTable base;
//! the relay leaves muted people out when it queues a report (`crate::relay`).

use std::collections::BTreeSet;

use teloxide::prelude::*;
use tracing::info;

use super::texts;
use super::{HandlerResult, Registrar};
use crate::directory::{Mailbox, Snapshot, TitleFilter};

impl Registrar {
    /// The chat's rows as (mailbox row `_id`s, `reports_filter`) pairs: a person's (every
    /// `users` row with their Telegram id), or a group's (its `t_chats` row).
    fn chat_rows<'s>(
        snapshot: &'s Snapshot,
        msg: &Message,
    ) -> Vec<(&'s [String], Option<&'s TitleFilter>)> {
        let chat_id = msg.chat.id.0;
        if msg.chat.is_private() {
            snapshot
                .users
                .iter()
                .filter(|u| u.telegram_id == Some(chat_id))
                .map(|u| (u.mailbox_ids.as_slice(), u.reports_filter.as_ref()))
                .collect()
        } else {
            snapshot
                .groups
                .iter()
                .filter(|g| g.chat_id == Some(chat_id))
                .map(|g| (g.mailbox_ids.as_slice(), g.reports_filter.as_ref()))
                .collect()
        }
    }

    /// The mailboxes the chat receives, by address.
    fn received<'s>(snapshot: &'s Snapshot, msg: &Message) -> Vec<&'s Mailbox> {
        let ids: BTreeSet<&String> = Self::chat_rows(snapshot, msg)
            .into_iter()
            .flat_map(|(ids, _)| ids)
            .collect();
        let mut mailboxes: Vec<&Mailbox> = snapshot
            .mailboxes
            .iter()
            .filter(|m| ids.contains(&m.row_id))
            .collect();
        mailboxes.sort_by(|a, b| a.email.cmp(&b.email));
        mailboxes.dedup_by(|a, b| a.email.eq_ignore_ascii_case(&b.email));
        mailboxes
    }

    /// `/reports`: each mailbox the chat receives, with `(paused)` for a person's mutes.
    pub(super) async fn reports(&self, bot: &Bot, msg: &Message) -> HandlerResult {
        let chat = msg.chat.id;
        let Some(snapshot) = self.directory.snapshot().await else {
            bot.send_message(chat, texts::TRY_LATER).await?;
            return Ok(());
        };
        let mailboxes = Self::received(&snapshot, msg);
        let muted = if msg.chat.is_private() {
            self.state.mutes_of(chat.0).await?
        } else {
            Vec::new()
        };
        let lines: Vec<texts::ReportLine> = mailboxes
            .iter()
            .map(|m| texts::ReportLine {
                name: display_name(m),
                address: m.email.clone(),
                paused: muted.contains(&m.email.to_ascii_lowercase()),
            })
            .collect();
        let filters = Self::filters(&snapshot, msg);
        bot.send_message(chat, texts::reports(&lines, &filters))
            .await?;
        Ok(())
    }

    /// The chat's `reports_filter` cells, as the sysadmin wrote them.
    fn filters(snapshot: &Snapshot, msg: &Message) -> Vec<String> {
        let filters: BTreeSet<String> = Self::chat_rows(snapshot, msg)
            .into_iter()
            .filter_map(|(_, filter)| filter)
            .map(|f| f.as_str().to_owned())
            .collect();
        filters.into_iter().collect()
    }

    /// `/mute <mailbox>`: the mailbox named by its address, `Name` or description, among those
    /// the person receives.
    pub(super) async fn mute(&self, bot: &Bot, msg: &Message, wanted: &str) -> HandlerResult {
        let chat = msg.chat.id;
        if !msg.chat.is_private() {
            bot.send_message(chat, texts::MUTE_PRIVATE_ONLY).await?;
            return Ok(());
        }
        let Some(snapshot) = self.directory.snapshot().await else {
            bot.send_message(chat, texts::TRY_LATER).await?;
            return Ok(());
        };
        let mailboxes = Self::received(&snapshot, msg);
        let Some(mailbox) = find(&mailboxes, wanted) else {
            bot.send_message(chat, texts::not_received(wanted.trim()))
                .await?;
            return Ok(());
        };
        self.state.mute(chat.0, &mailbox.email).await?;
        info!(
            chat_id = chat.0,
            mailbox = %mailbox.email,
            "A person paused a mailbox with /mute."
        );
        bot.send_message(chat, texts::muted(&display_name(mailbox), &mailbox.email))
            .await?;
        Ok(())
    }

    /// `/unmute [mailbox]`: resumes one mailbox, or every paused one without an argument.
    pub(super) async fn unmute(&self, bot: &Bot, msg: &Message, wanted: &str) -> HandlerResult {
        let chat = msg.chat.id;
        if !msg.chat.is_private() {
            bot.send_message(chat, texts::MUTE_PRIVATE_ONLY).await?;
            return Ok(());
        }
        let wanted = wanted.trim();
        if wanted.is_empty() {
            let resumed = self.state.unmute(chat.0, None).await?;
            info!(
                chat_id = chat.0,
                resumed, "A person resumed every mailbox with /unmute."
            );
            bot.send_message(chat, texts::unmuted_all(resumed)).await?;
            return Ok(());
        }
        let Some(snapshot) = self.directory.snapshot().await else {
            bot.send_message(chat, texts::TRY_LATER).await?;
            return Ok(());
        };
        let mailboxes = Self::received(&snapshot, msg);
        // A mailbox no longer assigned can still be resumed by its address.
        let address =
            find(&mailboxes, wanted).map_or_else(|| wanted.to_owned(), |m| m.email.clone());
        let resumed = self.state.unmute(chat.0, Some(&address)).await?;
        info!(chat_id = chat.0, mailbox = %address, resumed, "A person resumed a mailbox with /unmute.");
        bot.send_message(chat, texts::unmuted(&address, resumed > 0))
            .await?;
        Ok(())
    }
}

/// What the bot calls a mailbox: its description, else its `Name`, else its address.
fn display_name(mailbox: &Mailbox) -> String {
    [&mailbox.description, &mailbox.name, &mailbox.email]
        .into_iter()
        .find(|text| !text.trim().is_empty())
        .cloned()
        .unwrap_or_default()
}

/// The mailbox of `mailboxes` that `wanted` names: its address, `Name` or description, matched
/// case-insensitively.
fn find<'m>(mailboxes: &[&'m Mailbox], wanted: &str) -> Option<&'m Mailbox> {
    let wanted = wanted.trim();
    if wanted.is_empty() {
        return None;
    }
    mailboxes.iter().copied().find(|m| {
        [&m.email, &m.name, &m.description]
            .into_iter()
            .any(|text| !text.is_empty() && text.eq_ignore_ascii_case(wanted))
    })
}
