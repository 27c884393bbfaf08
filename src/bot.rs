//! The registration bot: a teloxide dispatcher on long polling, next to the watchers.
//!
//! - **People** press `/start` in a private chat and share their own phone number (Bot API
//!   `KeyboardButton.request_contact`). The number is normalised to E.164 digits and matched
//!   against the `phone` column; the matching rows get `id_telegram`. A contact is accepted only
//!   when the chat is private, `contact.user_id == from.id` and the message is not forwarded:
//!   anyone can share anyone's contact card (telegram-bot-api.md §5.1).
//! - **Groups** register when their admins promote the bot to administrator (`my_chat_member`).
//!   The `t_chats` row whose `Name` equals the group title is claimed with one conditional
//!   statement and read back; a claimed (or reserved, locked) row is never re-bound to another
//!   chat. Claims are serialised inside the process.
//! - **Blocking and removal** (`my_chat_member` to `kicked`/`left`) are recorded in the state,
//!   not in SeaTable, and such chats are skipped in deliveries until they come back.
//! - **Migration** of a basic group to a supergroup rewrites the row's id, keeping the lock; the
//!   same [`Migrations`] handler serves the delivery worker.

mod reports;
pub mod texts;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use teloxide::dispatching::{HandlerExt, UpdateFilterExt};
use teloxide::payloads::SendMessageSetters;
use teloxide::prelude::*;
use teloxide::types::{
    ButtonRequest, ChatMemberUpdated, Contact, KeyboardButton, KeyboardMarkup, KeyboardRemove,
    ReplyMarkup,
};
use teloxide::utils::command::BotCommands;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::directory::{ChatStatuses, Directory, Group, Migrations, Snapshot, User};
use crate::state::State;

/// How long a promotion from a supergroup waits for the migration message of its basic group
/// (they arrive as separate updates, possibly handled concurrently).
const MIGRATION_WAIT: Duration = Duration::from_secs(5);

/// The bot's commands, registered with `setMyCommands`.
#[derive(BotCommands, Clone, Debug, PartialEq, Eq)]
#[command(rename_rule = "lowercase")]
pub enum Command {
    /// Register, or show which reports you receive.
    #[command(description = "register, or show which reports you receive")]
    Start,
    /// How registration works.
    #[command(description = "how registration works")]
    Help,
    /// What this chat receives.
    #[command(description = "list the reports you receive")]
    Reports,
    /// Pause one mailbox for yourself.
    #[command(description = "pause one mailbox's reports for you: /mute <address>")]
    Mute(String),
    /// Resume one mailbox, or all.
    #[command(description = "resume paused reports: /unmute [address]")]
    Unmute(String),
}

/// Normalises a phone number to E.164 digits (no `+`), as Telegram sends them.
///
/// `+7 (999) 123-45-67`, `79991234567` and `0079991234567` give `79991234567`; with
/// `default_country_code` `7`, `8 999 123 45 67` (an 11-digit number with the trunk prefix 8)
/// and `9991234567` (10 digits) do too. Returns `None` when fewer than 7 digits remain.
pub fn normalize_phone(raw: &str, default_country_code: &str) -> Option<String> {
    let trimmed = raw.trim();
    let international = trimmed.starts_with('+');
    let mut digits: String = trimmed.chars().filter(char::is_ascii_digit).collect();
    if !international {
        if let Some(rest) = digits.strip_prefix("00") {
            digits = rest.to_owned();
        } else if digits.len() == 11 && digits.starts_with('8') {
            digits = format!("{default_country_code}{}", &digits[1..]);
        } else if digits.len() == 10 {
            digits = format!("{default_country_code}{digits}");
        }
    }
    (digits.len() >= 7).then_some(digits)
}

/// The digits of a phone number as Telegram sends it in a shared contact
/// (`Contact.phone_number`): already international, with or without a leading `+`, so no
/// national rule applies (`4741234567` is a Norwegian number, not a Russian one missing its 7).
/// Returns `None` when fewer than 7 digits remain.
pub fn telegram_phone_digits(raw: &str) -> Option<String> {
    let digits: String = raw.chars().filter(char::is_ascii_digit).collect();
    (digits.len() >= 7).then_some(digits)
}

/// The users rows whose `phone` (as sysadmins type it, normalised with
/// `default_country_code`) is the number of a shared Telegram contact.
pub fn users_with_phone<'a>(
    users: &'a [User],
    telegram_phone: &str,
    default_country_code: &str,
) -> Vec<&'a User> {
    let Some(digits) = telegram_phone_digits(telegram_phone) else {
        return Vec::new();
    };
    users
        .iter()
        .filter(|u| normalize_phone(&u.phone, default_country_code).as_deref() == Some(&*digits))
        .collect()
}

/// Trims a group title and collapses its inner whitespace (the comparison stays
/// case-sensitive).
pub fn normalize_title(title: &str) -> String {
    title.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The registration logic behind the handlers.
pub struct Registrar {
    directory: Arc<Directory>,
    state: State,
    statuses: Arc<ChatStatuses>,
    migrations: Arc<Migrations>,
    default_country_code: String,
    claims: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Registrar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Registrar")
    }
}

type HandlerResult = anyhow::Result<()>;

impl Registrar {
    /// A registrar writing through `directory`, keeping mutes in `state`.
    pub fn new(
        directory: Arc<Directory>,
        state: State,
        statuses: Arc<ChatStatuses>,
        migrations: Arc<Migrations>,
        default_country_code: String,
    ) -> Arc<Self> {
        Arc::new(Self {
            directory,
            state,
            statuses,
            migrations,
            default_country_code,
            claims: tokio::sync::Mutex::new(()),
        })
    }

    /// Display names of mailboxes by row `_id`: the `description`, else the `Name`; unique and
    /// sorted.
    fn mailbox_names<'a>(
        snapshot: &Snapshot,
        ids: impl Iterator<Item = &'a String>,
    ) -> Vec<String> {
        let ids: BTreeSet<&String> = ids.collect();
        let names: BTreeSet<String> = snapshot
            .mailboxes
            .iter()
            .filter(|m| ids.contains(&m.row_id))
            .map(|m| {
                if m.description.is_empty() {
                    m.name.clone()
                } else {
                    m.description.clone()
                }
            })
            .collect();
        names.into_iter().collect()
    }

    /// Re-reads SeaTable for a registration; when it cannot, tells the chat to try later and
    /// returns `None`.
    async fn fresh_snapshot(
        &self,
        bot: &Bot,
        chat: ChatId,
    ) -> anyhow::Result<Option<Arc<Snapshot>>> {
        match self.directory.refresh().await {
            Ok(snapshot) => Ok(Some(snapshot)),
            Err(error) => {
                warn!(
                    chat_id = chat.0,
                    error = format!("{error:#}"),
                    "Cannot read SeaTable for a registration."
                );
                bot.send_message(chat, texts::TRY_LATER).await?;
                Ok(None)
            }
        }
    }

    async fn start(&self, bot: &Bot, msg: &Message) -> HandlerResult {
        let chat = msg.chat.id;
        if !msg.chat.is_private() {
            bot.send_message(chat, texts::HELP).await?;
            return Ok(());
        }
        let Some(user) = &msg.from else {
            return Ok(());
        };
        let id = user.id.0 as i64;
        if self.statuses.status(id).is_some() {
            self.statuses.set(id, None).await?;
            info!(
                chat_id = id,
                "A user came back with /start; delivering to them again."
            );
        }
        let Some(snapshot) = self.directory.snapshot().await else {
            bot.send_message(chat, texts::TRY_LATER).await?;
            return Ok(());
        };
        let rows: Vec<_> = snapshot
            .users
            .iter()
            .filter(|u| u.telegram_id == Some(id))
            .collect();
        if rows.is_empty() {
            let keyboard = KeyboardMarkup::new(vec![vec![
                KeyboardButton::new(texts::SHARE_PHONE_BUTTON).request(ButtonRequest::Contact),
            ]])
            .one_time_keyboard()
            .resize_keyboard();
            bot.send_message(chat, texts::START_UNREGISTERED)
                .reply_markup(ReplyMarkup::Keyboard(keyboard))
                .await?;
        } else {
            let names = Self::mailbox_names(&snapshot, rows.iter().flat_map(|u| &u.mailbox_ids));
            bot.send_message(chat, texts::mailbox_list(&names)).await?;
        }
        Ok(())
    }

    async fn contact(&self, bot: &Bot, msg: &Message, contact: &Contact) -> HandlerResult {
        let chat = msg.chat.id;
        if !msg.chat.is_private() {
            bot.send_message(chat, texts::PRIVATE_ONLY).await?;
            return Ok(());
        }
        let from = msg.from.as_ref().map(|u| u.id);
        let own = contact.user_id.is_some() && contact.user_id == from;
        if !own || msg.forward_origin().is_some() {
            warn!(
                chat_id = chat.0,
                contact_user_id = contact.user_id.map(|u| u.0),
                forwarded = msg.forward_origin().is_some(),
                "Refused a contact that is not the sender's own."
            );
            bot.send_message(chat, texts::NOT_YOUR_CONTACT).await?;
            return Ok(());
        }
        let id = chat.0;
        if telegram_phone_digits(&contact.phone_number).is_none() {
            bot.send_message(chat, texts::NOT_ON_LIST).await?;
            return Ok(());
        }
        let _claims = self.claims.lock().await;
        let Some(snapshot) = self.fresh_snapshot(bot, chat).await? else {
            return Ok(());
        };
        let rows = users_with_phone(
            &snapshot.users,
            &contact.phone_number,
            &self.default_country_code,
        );
        if rows.is_empty() {
            info!(chat_id = id, "A shared phone number matches no user row.");
            bot.send_message(chat, texts::NOT_ON_LIST).await?;
            return Ok(());
        }
        if rows.len() > 1 {
            let row_ids: Vec<&str> = rows.iter().map(|u| u.row_id.as_str()).collect();
            warn!(
                chat_id = id,
                ?row_ids,
                "Several user rows have the same phone number; all of them get this Telegram id."
            );
        }
        let mut wrote = false;
        for row in &rows {
            match row.telegram_id {
                Some(existing) if existing == id => continue,
                Some(existing) => warn!(
                    row_id = %row.row_id,
                    old_id = existing,
                    new_id = id,
                    "A user row already had another Telegram id; overwriting it (the phone number proves ownership)."
                ),
                None => {}
            }
            if let Err(error) = self
                .directory
                .backend()
                .write_user_telegram_id(&row.row_id, id)
                .await
            {
                error!(row_id = %row.row_id, error = format!("{error:#}"), "Cannot write id_telegram to SeaTable.");
                bot.send_message(chat, texts::TRY_LATER).await?;
                return Ok(());
            }
            wrote = true;
        }
        let names = Self::mailbox_names(&snapshot, rows.iter().flat_map(|u| &u.mailbox_ids));
        if wrote {
            info!(chat_id = id, rows = rows.len(), "Registered a user.");
            if let Err(error) = self.directory.refresh().await {
                warn!(
                    error = format!("{error:#}"),
                    "Cannot refresh the directory after a registration."
                );
            }
        }
        if self.statuses.status(id).is_some() {
            self.statuses.set(id, None).await?;
        }
        bot.send_message(
            chat,
            format!("{}\n\n{}", texts::REGISTERED, texts::mailbox_list(&names)),
        )
        .reply_markup(ReplyMarkup::KeyboardRemove(KeyboardRemove::new()))
        .await?;
        Ok(())
    }

    async fn member_update(&self, bot: &Bot, update: &ChatMemberUpdated) -> HandlerResult {
        let chat = &update.chat;
        let id = chat.id.0;
        let new = &update.new_chat_member.kind;
        let old = &update.old_chat_member.kind;
        if chat.is_private() {
            if new.is_banned() {
                info!(
                    chat_id = id,
                    "The user blocked the bot; skipping them until their next /start."
                );
                self.statuses.set(id, Some("blocked")).await?;
            } else if new.is_present() && self.statuses.status(id).is_some() {
                info!(chat_id = id, "The user unblocked the bot.");
                self.statuses.set(id, None).await?;
            }
            return Ok(());
        }
        if !(chat.is_group() || chat.is_supergroup()) {
            return Ok(());
        }
        if new.is_administrator() {
            if self.statuses.status(id).is_some() {
                self.statuses.set(id, None).await?;
            }
            if old.is_administrator() {
                // Only the bot's admin rights changed: nothing to register again.
                return Ok(());
            }
            return self.promoted(bot, update).await;
        }
        if new.is_present() {
            if self.statuses.status(id).is_some() {
                self.statuses.set(id, None).await?;
            }
            if !old.is_present() {
                bot.send_message(chat.id, texts::ADDED_AS_MEMBER).await?;
            }
            return Ok(());
        }
        let status = if new.is_banned() { "kicked" } else { "left" };
        warn!(
            chat_id = id,
            title = chat.title().unwrap_or(""),
            status,
            "The bot was removed from a group; skipping it until it is added again."
        );
        self.statuses.set(id, Some(status)).await?;
        Ok(())
    }

    async fn promoted(&self, bot: &Bot, update: &ChatMemberUpdated) -> HandlerResult {
        let chat = &update.chat;
        let id = chat.id.0;
        let title = normalize_title(chat.title().unwrap_or_default());
        let _claims = self.claims.lock().await;
        let Some(snapshot) = self.fresh_snapshot(bot, chat.id).await? else {
            return Ok(());
        };
        let rows: Vec<&Group> = snapshot
            .groups
            .iter()
            .filter(|g| normalize_title(&g.name) == title)
            .collect();
        let row = match rows.as_slice() {
            [] => {
                info!(chat_id = id, %title, "Promoted in a group with no matching row.");
                bot.send_message(chat.id, texts::group_not_configured(&title))
                    .await?;
                return Ok(());
            }
            [row] => *row,
            several => {
                let row_ids: Vec<&str> = several.iter().map(|g| g.row_id.as_str()).collect();
                warn!(chat_id = id, %title, ?row_ids, "Several group rows have this name; refusing to guess. Make the names unique.");
                bot.send_message(chat.id, texts::group_ambiguous(&title))
                    .await?;
                return Ok(());
            }
        };
        let won = match row.chat_id {
            Some(bound) if bound == id => true,
            Some(bound) => {
                // A basic group upgraded while the bot was promoted: the promotion comes from
                // the new supergroup id, maybe before the migration message was handled.
                // Only a basic group (ids above -10^12) can have become this supergroup.
                let basic_group = (-999_999_999_999..0).contains(&bound);
                let migrated = chat.is_supergroup()
                    && basic_group
                    && self.migrations.migrated_from(id, MIGRATION_WAIT).await == Some(bound);
                if migrated {
                    self.migrations.migrated(bound, id).await?;
                    true
                } else {
                    warn!(chat_id = id, bound_chat_id = bound, %title, row_id = %row.row_id,
                          "A chat tried to register a group name that is bound to another chat; refused (possible takeover).");
                    false
                }
            }
            None if row.is_locked => {
                warn!(chat_id = id, %title, row_id = %row.row_id,
                      "A chat tried to register a reserved (locked) group row; refused.");
                false
            }
            None => match self.directory.backend().claim_group(&row.row_id, id).await {
                Ok(true) => {
                    info!(chat_id = id, %title, row_id = %row.row_id, "Registered a group.");
                    true
                }
                Ok(false) => {
                    warn!(chat_id = id, %title, row_id = %row.row_id,
                          "Lost the claim of a group row to another chat; refused.");
                    false
                }
                Err(error) => {
                    error!(
                        chat_id = id,
                        error = format!("{error:#}"),
                        "Cannot claim a group row in SeaTable."
                    );
                    bot.send_message(chat.id, texts::TRY_LATER).await?;
                    return Ok(());
                }
            },
        };
        if !won {
            bot.send_message(chat.id, texts::group_taken(&title))
                .await?;
            return Ok(());
        }
        let names = Self::mailbox_names(&snapshot, row.mailbox_ids.iter());
        if let Err(error) = self.directory.refresh().await {
            warn!(
                error = format!("{error:#}"),
                "Cannot refresh the directory after a group registration."
            );
        }
        bot.send_message(
            chat.id,
            format!(
                "{}\n\n{}",
                texts::group_registered(&title),
                texts::mailbox_list(&names)
            ),
        )
        .await?;
        Ok(())
    }
}

async fn on_command(
    bot: Bot,
    msg: Message,
    command: Command,
    registrar: Arc<Registrar>,
) -> HandlerResult {
    match command {
        Command::Start => registrar.start(&bot, &msg).await,
        Command::Help => {
            bot.send_message(msg.chat.id, texts::HELP).await?;
            Ok(())
        }
        Command::Reports => registrar.reports(&bot, &msg).await,
        Command::Mute(mailbox) => registrar.mute(&bot, &msg, &mailbox).await,
        Command::Unmute(mailbox) => registrar.unmute(&bot, &msg, &mailbox).await,
    }
}

async fn on_contact(
    bot: Bot,
    msg: Message,
    contact: Contact,
    registrar: Arc<Registrar>,
) -> HandlerResult {
    registrar.contact(&bot, &msg, &contact).await
}

async fn on_member(
    bot: Bot,
    update: ChatMemberUpdated,
    registrar: Arc<Registrar>,
) -> HandlerResult {
    registrar.member_update(&bot, &update).await
}

async fn on_migration(msg: Message, registrar: Arc<Registrar>) -> HandlerResult {
    let (old, new) = match (msg.migrate_to_chat_id(), msg.migrate_from_chat_id()) {
        (Some(to), _) => (msg.chat.id.0, to.0),
        (None, Some(from)) => (from.0, msg.chat.id.0),
        (None, None) => return Ok(()),
    };
    info!(old, new, "A group was upgraded to a supergroup.");
    registrar.migrations.migrated(old, new).await
}

/// Builds the polling bot: teloxide's default client (its 17 s timeout suits the 10 s long
/// poll).
///
/// # Errors
/// `api_url` is not a URL.
pub fn polling_bot(token: &secrecy::SecretString, api_url: &str) -> anyhow::Result<Bot> {
    use secrecy::ExposeSecret;
    Ok(Bot::new(token.expose_secret()).set_api_url(reqwest::Url::parse(api_url)?))
}

/// Registers the command menu, then handles updates until `cancel` fires.
pub async fn run(bot: Bot, registrar: Arc<Registrar>, cancel: CancellationToken) {
    match bot.set_my_commands(Command::bot_commands()).await {
        Ok(_) => {}
        Err(error) => warn!(%error, "Cannot register the bot's command menu (setMyCommands)."),
    }
    let handler = dptree::entry()
        .branch(
            Update::filter_message()
                .branch(
                    dptree::filter(|msg: Message| {
                        msg.migrate_to_chat_id().is_some() || msg.migrate_from_chat_id().is_some()
                    })
                    .endpoint(on_migration),
                )
                .branch(Message::filter_contact().endpoint(on_contact))
                .branch(
                    dptree::entry()
                        .filter_command::<Command>()
                        .endpoint(on_command),
                ),
        )
        .branch(Update::filter_my_chat_member().endpoint(on_member));
    let mut dispatcher = Dispatcher::builder(bot, handler)
        .dependencies(dptree::deps![registrar])
        .default_handler(|_| async {})
        .error_handler(LoggingErrorHandler::with_custom_text(
            "A registration update failed",
        ))
        .build();
    let token = dispatcher.shutdown_token();
    let stopper = tokio::spawn(async move {
        cancel.cancelled().await;
        // The dispatcher refuses to shut down before it has started; try until it takes.
        loop {
            match token.shutdown() {
                Ok(done) => {
                    done.await;
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    dispatcher.dispatch().await;
    stopper.abort();
    info!("Registration bot stopped.");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telegram_numbers_are_international_as_they_come() {
        let user = |row_id: &str, phone: &str| User {
            row_id: row_id.into(),
            name: row_id.into(),
            phone: phone.into(),
            mailbox_ids: Vec::new(),
            telegram_id: None,
            reports_filter: None,
        };
        let users = [
            user("ru-474", "+7 474 123-45-67"),
            user("ru-491", "8 491 234 56 78"),
            user("no", "+47 41 23 45 67"),
            user("vn", "+84 91 234 56 78"),
            user("ru-999", "8 (999) 123-45-67"),
        ];
        let rows = |phone: &str| -> Vec<String> {
            users_with_phone(&users, phone, "7")
                .iter()
                .map(|u| u.row_id.clone())
                .collect()
        };
        // Norway (+47, 10 digits) and Vietnam (+84, 11 digits starting with 8) look like
        // national Russian numbers to the SeaTable rules; Telegram's digits are taken as they
        // are, so each matches its own row only.
        assert_eq!(rows("4741234567"), ["no"]);
        assert_eq!(rows("+4741234567"), ["no"]);
        assert_eq!(rows("84912345678"), ["vn"]);
        assert_eq!(rows("74741234567"), ["ru-474"]);
        assert_eq!(rows("74912345678"), ["ru-491"]);
        assert_eq!(rows("+79991234567"), ["ru-999"]);
        assert!(
            rows("89991234567").is_empty(),
            "Telegram never sends a trunk prefix"
        );
        assert!(rows("123").is_empty());
    }

    #[test]
    fn phone_numbers_normalise_to_e164_digits() {
        for raw in [
            "79991234567",
            "+79991234567",
            "+7 (999) 123-45-67",
            "8 999 123 45 67",
            "89991234567",
            "9991234567",
            "0079991234567",
        ] {
            assert_eq!(
                normalize_phone(raw, "7").as_deref(),
                Some("79991234567"),
                "{raw}"
            );
        }
        assert_eq!(
            normalize_phone("+44 20 7946 0958", "7").as_deref(),
            Some("442079460958")
        );
        assert_eq!(normalize_phone("12-34", "7"), None);
        assert_eq!(normalize_phone("", "7"), None);
    }

    #[test]
    fn titles_are_trimmed_and_collapsed_but_case_sensitive() {
        assert_eq!(normalize_title("  Sales \t team  "), "Sales team");
        assert_ne!(normalize_title("sales team"), normalize_title("Sales team"));
    }

    #[test]
    fn the_command_menu_has_registration_and_the_reports_commands() {
        let names: Vec<String> = Command::bot_commands()
            .into_iter()
            .map(|c| c.command)
            .collect();
        assert_eq!(names, ["/start", "/help", "/reports", "/mute", "/unmute"]);
    }
}
