-- A new nullable column: existing rows keep their data.
ALTER TABLE customers ADD COLUMN country TEXT;
